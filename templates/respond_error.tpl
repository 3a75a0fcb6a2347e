% rebase('base.tpl', title=get('title', 'Cannot continue'))
<p class="outcome" id="outcome">{{message}}</p>
